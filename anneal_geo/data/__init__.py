"""anneal_geo.data"""
