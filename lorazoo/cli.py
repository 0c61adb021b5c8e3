def main(argv=None):
    raise SystemExit("lorazoo bench is not available yet")
