"""The recipes that produced the shipped demo assets (run by ``rmserve demo ...``), on HH-RLHF."""
