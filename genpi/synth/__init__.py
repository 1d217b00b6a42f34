"""Synthesis by Self Role-Playing: inputs, AS-IS/TO-BE replies, reasons."""
