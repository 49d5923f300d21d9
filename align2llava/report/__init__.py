"""The curation report: what the pipeline kept, dropped and rewrote, and why (reports/curation/)."""
