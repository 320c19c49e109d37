"""MCP: the session tools for assistants (contract §9), over Streamable HTTP and stdio."""
