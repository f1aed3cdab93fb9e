"""Model runtime, fine-tuning and checkpoint registry for the SAM backend (no HTTP, no Label Studio JSON)."""
