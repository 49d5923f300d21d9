"""Scripts that print figures (timings, diagnoses of the demo); run from the repository root as
`python -m benchmarks.<name>`."""
