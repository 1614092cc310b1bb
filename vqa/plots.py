"""The one matplotlib setup: a file-only backend (no screen here or on servers), imported when a
plot is drawn, so that importing vqa never pays for matplotlib."""


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
