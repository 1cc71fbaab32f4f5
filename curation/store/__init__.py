"""Store: what a build leaves on disk — shards, the findings cache, the ledger and the dataset
card — and the row schema they share with readers.
"""
