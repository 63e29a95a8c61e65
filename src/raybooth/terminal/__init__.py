"""What the user's terminal shows: status lines (log), progress bars (progress), and Ray's own output
kept out of the way (raylog, native). The lowest layer beside errors.py: anything may import it."""
