"""The safety lab: AI-text detection, hallucination checks and the statistics every safety number needs."""
