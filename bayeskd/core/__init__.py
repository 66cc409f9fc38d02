"""The math every stage shares, below the stages: it imports nothing from them (only `bayeskd.integrity` for the
shards' files and `bayeskd.codec` for compact shards).

sparse.py (`SparseDist`, its shards on disk, and every mode name and extras key, once), checks.py (the input checks),
combine.py (the combination rules: log-linear, mixture, Dirichlet, adaptive; `combine` and `combine_rows`),
adaptive.py (mode "adaptive": per-row mixture weights and their fit), condition.py (conditioning on revealed
log-probabilities). Import each name from its module; this package re-exports nothing (`combine` is a function of
`bayeskd.core.combine` and of `bayeskd`).
"""
