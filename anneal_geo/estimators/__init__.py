"""anneal_geo.estimators"""
