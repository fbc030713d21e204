"""anneal_geo.backbones"""
