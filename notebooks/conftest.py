"""nbval settings for the course notebooks."""


def pytest_collectstart(collector):
    # Library warnings and progress bars go to stderr and differ between machines; stdout and results are compared.
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr",)
