"""MQTT on the server: ingest of device messages, retained desired states."""
