"""Operations: failure alerts for on-call staff."""
