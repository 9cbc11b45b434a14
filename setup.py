from setuptools import find_packages, setup

setup(
    name="nixery",
    version="0.1.0",
    description="A container registry that builds images on demand with Nix",
    license="MIT",
    python_requires=">=3.10",
    # static/ (the web page's templates, stylesheet and icon) is installed as nixery/static,
    # where nixery.web finds it with importlib.resources; a checkout reads it in place.
    packages=find_packages(include=["nixery", "nixery.*"]) + ["nixery.static"],
    package_dir={"nixery.static": "static"},
    package_data={"nixery.nix": ["*.nix"], "nixery.static": ["*"]},
    include_package_data=True,
    # The one list of Python dependencies (the Nix package installs the same, with GCS).
    install_requires=[
        "falcon>=3.1",
        # The releases tests/test_gunicorn_versions.py runs the worker on: 23.0 (Debian trixie's and
        # NixOS stable's) to the newest 27; the next major version is untried.
        "gunicorn>=23,<28",
        "pygit2>=1.12",
        "networkx>=3.0",
        "isal>=1.6",  # igzip_threaded leaves the stream it writes to open (1.6)
        "prometheus-client>=0.17",
        "bcrypt>=4.0",
        "PyJWT[crypto]>=2.8",
        "cryptography>=41",
        "rapidfuzz>=3.0",  # "did you mean": close names among tens of thousands, in C++
    ],
    extras_require={
        # The GCS backend (BUCKET / GCS_BUCKET): without it, a bucket is a start-up error naming the variable.
        # Literal lists (tests read this file with ast.literal_eval); the tests need the GCS extra too.
        "gcs": ["google-cloud-storage>=2.10", "google-auth>=2.20"],
        "test": ["google-cloud-storage>=2.10", "google-auth>=2.20", "pytest>=7", "requests>=2.28",
                 "gcp-storage-emulator", "websocket-client", "pyyaml",
                 "pytest-xdist", "packaging", "kubernetes-validate"],
    },
    entry_points={"console_scripts": ["nixery = nixery.__main__:main"]},
)
