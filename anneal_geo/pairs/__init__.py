"""anneal_geo.pairs"""
