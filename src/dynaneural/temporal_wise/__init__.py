"""temporal_wise"""
