"""Every SQL statement, as short async functions taking a connection, one module per table group.

The caller owns the connection, and so the transaction. Rows never leave the package as
`asyncpg.Record`. Nothing is re-exported here: import the module of the table group.
"""
