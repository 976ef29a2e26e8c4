"""Operations: health, Prometheus metrics and systemd notification."""
