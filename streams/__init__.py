"""The Faust application: built by :func:`streams.app.create_app` from one settings object."""
