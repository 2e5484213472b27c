"""Training of both networks (imports from app/, never the other way round)."""
