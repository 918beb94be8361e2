"""Health-linked layer: social care events linked to hospital spells on the person token."""
