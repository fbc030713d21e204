"""anneal_geo.selectors"""
