"""Client libraries: the service SDK (`client`), the car agent (`vehicle`) and the
fleet simulator built on it (`simulator`). They import nothing of the server."""
