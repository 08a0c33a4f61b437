"""spatial_wise"""
