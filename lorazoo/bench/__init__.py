"""The comparative benchmark behind ``lorazoo bench``."""
