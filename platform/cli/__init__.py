"""Command-line entry point: `faceforge <command>`."""
def main() -> None:
    print("hi")
