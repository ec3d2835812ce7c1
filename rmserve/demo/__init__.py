"""The built-in demo reward models, assembled from the files the package ships (``rmserve.demo.build``)."""
