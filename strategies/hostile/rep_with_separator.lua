-- The same with an empty separator and a method call.
return { plan = function(ctx)
    local s = (''):rep(1 << 40, '')
    return { ports = ctx.ports }
end }
