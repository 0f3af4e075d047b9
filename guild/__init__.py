"""realm guild: hero profiles and campaigns."""
