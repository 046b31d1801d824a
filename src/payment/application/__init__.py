"""Application layer: commands, contract messages, ports and handlers."""
