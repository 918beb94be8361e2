"""Privacy: identifier rules, pseudonymisation, disclosure control, data-subject rights, retention, audit."""
