"""The over-optimisation lab: prompts, policy samples, proxy reward models and best-of-n against a gold model.

``prompts`` splits a preference file's first user turns into proxy-training and evaluation prompts,
``generate`` samples candidate responses from a causal LM, ``candidates`` owns their file format,
``proxies`` trains proxy reward models on gold-labelled pairs of those samples, ``scoring`` scores
candidates through running servers with the client library, ``bon`` computes best-of-n curves, and
``report`` writes the table and the plot. ``rmserve lab ...`` (``rmserve.cli_lab``) drives them.
"""
