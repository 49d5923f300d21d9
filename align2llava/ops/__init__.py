"""Operations: tracking, the compression experiment, the command line, the summary."""
