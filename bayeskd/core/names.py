"""The names every stage shares, defined once: how prior and proxy combine, what revealed log-probabilities do, the
target codecs and the keys of a shard's extras. Plain strings with no import, so the CLI can offer them as choices
without loading torch (a SIGTERM during a job's start is then handled: cli._stop_cleanly)."""

CODECS = ("raw", "compact")  # target shard formats (bayeskd.codec)
CODEC_HELP = ("Target shard format: raw (int32 id + float32 log-prob, 8 bytes an entry) or compact (ids bit-packed, "
              "the sorted log-prob curve coded in steps, tail exact: <= 3 bytes an entry; KL to raw <= 1e-3 per "
              "position).")
MODES = ("log_linear", "dirichlet", "mixture", "adaptive")  # prior x proxy combinations (docs/MATH.md)
EVIDENCE_MODES = ("condition", "evidence_only")  # what revealed log-probabilities do to the posterior
TEACHER_LOGPROB = "proxy_teacher_logprob"  # per-row extra: the proxy's log q(teacher token | context)
CONTEXT_COUNT = "context_count"  # per-row extra of n-gram prior rows: the context's count (Dirichlet mode)
MATCH_LENGTH = "match_length"  # per-row extra of suffix-prior rows: the length of the longest matched context
RECORD_INDEX, LENGTHS = "record_index", "lengths"  # per-shard extras: the records a shard holds, rows of each
