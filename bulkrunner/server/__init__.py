"""The server: the Flask app and its API, the service, the dispatcher and what they use.

The only room that may import every other one (store, executors, runtime) and the
third-party server libraries (Flask, waitress, prometheus_client).
"""
