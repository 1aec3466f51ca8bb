"""The router: the OpenAI-compatible front end and the dispatch of requests to workers.

Nothing here may import torch: the router starts in well under a second.
"""
