"""The `bayeskd` command line: parse and validate, then call one library function."""
import click


@click.group()
@click.version_option(package_name="bayeskd")
def main() -> None:
    """Estimate a black-box teacher's token distributions and distill students from them."""


if __name__ == "__main__":
    main()
