"""Render: findings and templates → conversations (sandboxed Jinja, turns, phrasings, model card).

Knows nothing of experts, archives, Ray or torch: the build hands it plain descriptions of
the experts and findings with their pictures already made.
"""
