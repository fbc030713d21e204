"""anneal_geo.annotators"""
