"""anneal_geo.retrieval"""
