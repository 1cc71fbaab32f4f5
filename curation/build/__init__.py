"""Build: the Ray Data program that runs a manifest — plan, split, mixture, stages, cluster,
progress — from the index to the shard writer.
"""
