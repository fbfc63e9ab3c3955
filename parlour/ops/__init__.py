"""Operations: request logs, Prometheus metrics, rate limits and admission."""
