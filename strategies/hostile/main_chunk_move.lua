-- The same trick while the script is loading, before any hook is called.
table.move({}, 1, 1 << 40, 1)
return { plan = function(ctx) return { ports = ctx.ports } end }
