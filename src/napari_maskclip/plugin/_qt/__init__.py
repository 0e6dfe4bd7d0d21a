"""The Qt panels of the plugin (the only modules that import Qt): Segment, Export, Train and
Series, the sections of the Segment panel, small shared controls, and the job runner all panels
use."""
