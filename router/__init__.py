"""Router: placement of versions on workers, the route table, and the picker library gateways import."""
