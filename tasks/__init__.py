"""seqio Task and Mixture registrations: importing `tasks` registers all of them."""
