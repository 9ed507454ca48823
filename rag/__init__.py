"""The appliance's surface: question to answer, the CLI, and (later) the HTTP server and web page."""
