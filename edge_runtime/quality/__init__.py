"""Quality: label-map metrics, reference SEGs and in-service agreement."""
