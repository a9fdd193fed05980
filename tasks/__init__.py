"""Thin Prefect ``@task`` wrappers over porcelain's stage functions: cache policy, retries, results.

Each task rebuilds the :class:`~porcelain.storage.Store` from the small ``storage`` config it is
given and calls exactly one library function; tasks pass URIs, hashes and metrics, never tensors.
"""
