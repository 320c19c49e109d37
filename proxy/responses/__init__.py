"""The Responses and Conversations APIs over chat completions (contract §10).

- items: Responses items <-> chat messages, both ways (pure);
- request: a Responses request checked and translated into a chat completions body (pure);
- answer: the `response` object, from a turn's reply (pure);
- events: a chat.completion.chunk stream translated into the Responses event stream (pure,
  incremental);
- chain: the history of a `previous_response_id`, a `HistorySource` for the turn engine;
- turn: one response as a turn of the engine, answered whole or streamed, and stored.

The doors are proxy/routes/responses.py and proxy/routes/conversations.py; the SQL is
proxy/store/responses.py's and proxy/store/items.py's.
"""
