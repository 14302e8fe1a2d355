"""The cft_* lm-eval task families. Not imported by lm-eval: it reads the YAML files here through
`--include_path` / `TaskManager(include_path=...)`. This file makes the folder installable."""
